"""Image backends: the formats qcownbd can export, behind one interface."""
