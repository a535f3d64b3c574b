"""FedPM and its descendants as parts (``fedpm.py`` composes them into methods).

A mask method is

* client training (``training``): Adam on real scores over frozen random weights, with an
  optional entropy regulariser and a persistent optimizer; also the model's evaluation;
* an uplink codec (``codecs``, ``klms``): what leaves the client for its trained scores and
  what the server counts from it -- one sampled mask, the thresholded mask, KLMS block
  indices -- optionally wrapped by randomized response (``randomized_response``);
* the Beta server (``beta_server``): smoothing, prior and posterior mode;
* a downlink (``downlink``): what the clients receive in place of theta_g, and its bits.

Each part's settings are a small config dataclass; a method's config (the flags the command
line shows for it) inherits the parts it is made of.
"""
