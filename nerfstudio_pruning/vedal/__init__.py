"""VEDAL as plain tensor code: the convergence gate, the retention head and the controller that runs them."""
