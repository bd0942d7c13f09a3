"""CLISCSegment: text-prompted zero-shot segmentation of a loaded volume (skeleton; the GUI comes next)."""
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleWidget)


class CLISCSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "CLISC Segment"
        self.parent.categories = ["Segmentation"]
        self.parent.contributors = ["CLISC developers"]
        self.parent.helpText = "Segment a volume from a text prompt (CLIP saliency + Segment Anything)."
        self.parent.acknowledgementText = "Built on segment-anything, open_clip, MONAI and SimpleITK."


class CLISCSegmentWidget(ScriptedLoadableModuleWidget):
    pass


class CLISCSegmentLogic(ScriptedLoadableModuleLogic):
    pass
