"""The control plane: distribution protocol, server, proxy-side client, translation, CSR authorization."""
