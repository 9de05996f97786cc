"""Local tooling, apart from the code location: the source simulator, dev servers, the demo and LocalDagster."""
