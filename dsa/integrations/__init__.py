"""Integrations of the DSA modules with host libraries (Hugging Face transformers)."""
