"""Network definitions, one per file, and the name -> class registry."""
