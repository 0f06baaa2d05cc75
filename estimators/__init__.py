"""Statistics and models (numpy in, numpy out; sklearn-shaped), and the torch reward model. No Beam here."""
