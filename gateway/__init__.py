"""The gateway: WebRTC sessions, the conversation (policy without I/O) and its runner, worker pool (see README)."""
