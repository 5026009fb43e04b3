"""The benchmark harness: prompt sets and measurements of specfleet's paths side by side."""
