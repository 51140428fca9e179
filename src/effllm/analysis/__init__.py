"""Analysis: records -> runs table -> derived compression, normalised values, scores and
ranks -> tables."""
