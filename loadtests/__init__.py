"""Load tests for convserve: locust user classes and shapes (locustfile.py), the runner (run.py)."""
