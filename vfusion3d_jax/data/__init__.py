"""Data: TFRecord framing and offset indexes, the multi-view orbit Example schema, Grain input pipelines."""
