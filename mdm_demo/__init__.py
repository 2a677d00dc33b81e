"""Demo and test fixtures, kept out of the runtime package: generated studies (``synth``),
embedded local PACS (``localpacs``) and the demo mount (``demo``)."""
