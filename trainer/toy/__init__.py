"""The toy world: procedurally drawn scenes with captions (``world``), pixel-level detectors that read them back
(``detect``), and small bases pretrained on it, so tests and the demo can see what a LoRA learned."""
