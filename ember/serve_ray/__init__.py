"""Scale-out on Ray Serve (`ember serve --ray`): engine replicas, the router, the ingress's client.

Only routing.py imports nothing of Ray; the rest needs the extra (`pip install 'ember[ray]'`).
"""
