"""circuitdiff core: edge attribution of Hugging Face causal LMs before and after post-training.

Kept import-light on purpose: the dashboard imports core.query at page load, so torch and
transformers are imported only by the modules that need them.
"""

__version__ = "0.1.0"
