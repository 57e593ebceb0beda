"""Edge workers: one WebSocket server (:mod:`.server`) and one engine per kind."""
