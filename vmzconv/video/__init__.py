"""Video input shared by verify, predict and features: annotation lists, decoding (PyAV, Pillow),
the test protocols (sampling, resize, crops, normalisation) and the one frame-to-view builder
(``windows``) that cuts both protocol clips and sliding windows from a single pass over a video."""
