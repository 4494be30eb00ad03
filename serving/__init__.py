"""The BentoML service: /predict on the sparse path, /attack_probe, /model_info and Prometheus metrics."""
