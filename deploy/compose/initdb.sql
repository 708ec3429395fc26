-- Runs once, on the first start of the compose PostgreSQL (docker-entrypoint-initdb.d).
CREATE DATABASE switchyard_control;
CREATE DATABASE events_shared;
CREATE DATABASE events_dedicated;
