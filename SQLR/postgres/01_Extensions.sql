-- image-similarity on PostgreSQL 15+, step 1 of 2: extensions and the schema that holds the routines.
-- Run as a superuser in the database that will hold the images (e.g. createdb image_similarity):
--   psql -d image_similarity -f SQLR/postgres/01_Extensions.sql -f SQLR/postgres/02_Routines.sql
-- Tables (images, features with a pgvector column, splits, models, evaluations, rankings) are created by
-- the first routine or client that opens the database. Re-running is safe.
CREATE EXTENSION IF NOT EXISTS plpython3u;
CREATE EXTENSION IF NOT EXISTS vector;
CREATE SCHEMA IF NOT EXISTS image_similarity;
