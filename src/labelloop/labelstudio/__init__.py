"""Label Studio: protocol models, label configs, results, image access, a local launcher."""
