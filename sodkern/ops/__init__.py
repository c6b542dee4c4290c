"""Public ops: autograd Functions, backend dispatch and the chunked torch path for each op."""
