"""flashmath.integrations: flashmath inside frameworks' models.

``flashmath.integrations.transformers`` registers flashmath as a Hugging Face transformers
attention backend (optional extra ``flashmath[transformers]``); ``model_errors`` measures
the end-to-end logit error of a small model per attention backend. Import the submodules
directly: this package imports no framework.
"""
