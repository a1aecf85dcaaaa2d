"""Known-answer vectors of the wire format, one JSON file per protocol version (see make_vectors)."""
