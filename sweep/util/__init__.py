"""Small helpers every layer of `sweep` may use: ports and HTTP checks, process groups,
storage paths and atomic writes. Nothing here knows about specs, Ray, MLflow or trials."""
