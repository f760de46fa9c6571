"""Student sampling backends."""
