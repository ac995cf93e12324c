"""The three roles of a private-inference cluster, each one file: node, owner, client."""
