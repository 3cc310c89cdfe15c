"""weavelm-model-phi3: Phi-3 for weavelm, registered through the `weavelm` entry point (`weavelm_model_phi3.model`)."""
