"""CLISCTrain: cohort pseudo-labelling and 3D U-Net self-training (skeleton; the GUI comes next)."""
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleWidget)


class CLISCTrain(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "CLISC Train"
        self.parent.categories = ["Segmentation"]
        self.parent.contributors = ["CLISC developers"]
        self.parent.helpText = "Pseudo-label a cohort and self-train a 3D U-Net without annotations (CLISC)."
        self.parent.acknowledgementText = "Built on segment-anything, open_clip, MONAI and SimpleITK."


class CLISCTrainWidget(ScriptedLoadableModuleWidget):
    pass


class CLISCTrainLogic(ScriptedLoadableModuleLogic):
    pass
