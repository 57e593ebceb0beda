"""The gateway: WebRTC sessions, dialog orchestration, worker pool (see README)."""
