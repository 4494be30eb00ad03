"""The BentoML service: see issue 7."""
