"""vigos-ray: ViGOS post-training of vision-language models as a Ray pipeline (see README.md)."""
