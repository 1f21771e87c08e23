"""The control plane (istiod's role): CA signing and CSR authorization, translation of resources
into proxy state, the distribution server, and the config sources it watches."""
