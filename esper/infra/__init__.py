"""Infrastructure: embedded NATS and PostgreSQL servers, and where to find them."""
