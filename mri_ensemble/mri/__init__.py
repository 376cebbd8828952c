"""k-space maths: centred FFTs, coil combination, sampling masks, GRAPPA, image quality."""
