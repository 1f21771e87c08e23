"""Config distribution, proxy side: the wire protocol (sans-IO) and the client every proxy runs."""
