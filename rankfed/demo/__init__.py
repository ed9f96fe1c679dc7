"""`rankfed demo`: a real federation on localhost (see run.py), its data and evaluation."""
