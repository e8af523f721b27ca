//! The libp2p swarm shared by aimatrix nodes and the Studio relay (see docs/network.md).
