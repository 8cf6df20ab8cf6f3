"""Who is calling, and may they: authentication (auth.py) and policy."""
