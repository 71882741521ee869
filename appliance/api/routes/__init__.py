"""HTTP routes: parse, authorise via dependencies, call a service, shape the reply."""
