"""Generated Python modules of specfleet's wire contract (see protos/README.md)."""
