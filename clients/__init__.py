"""Python client, Triton client, the local Triton server and the locust load test: they talk to the
service over HTTP or the Triton protocol only."""
