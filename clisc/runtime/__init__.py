"""CPU runtimes for the models that run on every slice (`forwards`), with their exported models cached
(`export_cache`)."""
from .forwards import AUTO_ORDER, RUNTIMES, choose_runtime, installed, module_forward

__all__ = ["AUTO_ORDER", "RUNTIMES", "choose_runtime", "installed", "module_forward"]
