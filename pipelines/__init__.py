"""tessera.pipelines."""
