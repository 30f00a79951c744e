"""Side-by-side benchmark of river_broker against RabbitMQ, Redis and kombu's SQLAlchemy."""
