"""Where a session lives: its pin, the ring, its journal and the one mover."""
