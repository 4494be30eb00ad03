"""Python client, Triton client, locust load test and efficiency report: see issue 8."""
