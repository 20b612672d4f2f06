-- image-similarity on PostgreSQL, step 2 of 2: one PL/Python routine per step of the job.
-- Each body is one call into the image_similarity package, run by the server's own Python; arguments are
-- bound values, never SQL or Python text. The server must be able to import the package: see README.md
-- ("PostgreSQL"). Re-running this file replaces the routines; stored data is untouched.

-- What runs inside this server: backend pid, executable, Python and package versions, device.
CREATE OR REPLACE FUNCTION image_similarity.environment()
RETURNS TABLE (key text, value text)
LANGUAGE plpython3u AS $$
from image_similarity.contexts import plpython
return plpython.environment(plpy)
$$;

-- Validate and store one image; returns its new id, or the reason it was skipped (also recorded).
CREATE OR REPLACE FUNCTION image_similarity.add_image(name text, label text, data bytea,
                                                      OUT image_id bigint, OUT reason text)
LANGUAGE plpython3u AS $$
from image_similarity.contexts import plpython
return plpython.add_image(plpy, name, label, data)
$$;

-- Featurize every image without features for the backbone, committing each batch: an interrupted call
-- loses at most one batch, and calling it again resumes. CALL it outside an explicit transaction.
CREATE OR REPLACE PROCEDURE image_similarity.featurize_images(backbone text DEFAULT NULL,
                                                              batch_size integer DEFAULT 32,
                                                              INOUT added integer DEFAULT NULL,
                                                              INOUT skipped integer DEFAULT NULL,
                                                              INOUT device text DEFAULT NULL,
                                                              INOUT pid integer DEFAULT NULL)
LANGUAGE plpython3u AS $$
from image_similarity.contexts import plpython
return plpython.featurize_images(plpy, backbone, batch_size)
$$;

-- A new stratified train/test split (near-duplicates kept together): images per subset.
CREATE OR REPLACE FUNCTION image_similarity.prepare_data(test_fraction double precision DEFAULT 0.25,
                                                         seed integer DEFAULT 0)
RETURNS TABLE (subset text, images integer)
LANGUAGE plpython3u AS $$
from image_similarity.contexts import plpython
return plpython.prepare_data(plpy, test_fraction, seed)
$$;

-- Train a linear SVM (C by cross-validation) on the training split; stored as a new model version.
CREATE OR REPLACE FUNCTION image_similarity.train_model(backbone text DEFAULT NULL,
                                                        c_grid double precision[] DEFAULT NULL,
                                                        seed integer DEFAULT 0)
RETURNS TABLE (model_version integer, model_backbone text, c double precision,
               cv_accuracy double precision, n_train integer)
LANGUAGE plpython3u AS $$
from image_similarity.contexts import plpython
return plpython.train_model(plpy, backbone, c_grid, seed)
$$;

-- Evaluate a model (latest by default); the figures are stored, the summary is returned.
CREATE OR REPLACE FUNCTION image_similarity.evaluate_model(model_version integer DEFAULT NULL,
                                                           seed integer DEFAULT 0)
RETURNS jsonb
LANGUAGE plpython3u AS $$
from image_similarity.contexts import plpython
return plpython.evaluate_model(plpy, model_version, seed)
$$;

-- The catalogue images most similar to a query image (never the query itself or its near duplicates);
-- stored in queries/rankings. method NULL: the best of the latest evaluation.
-- issue 29: label NULL for an unlabelled image, then the model's suggestion for it; the item's key and metadata.
-- (Dropped first: an older release's function returned fewer columns, which CREATE OR REPLACE cannot change.)
DROP FUNCTION IF EXISTS image_similarity.rank_candidates(bytea, text, integer, text, integer);
CREATE OR REPLACE FUNCTION image_similarity.rank_candidates(query bytea, query_name text DEFAULT 'query',
                                                            top integer DEFAULT 10, method text DEFAULT NULL,
                                                            model_version integer DEFAULT NULL)
RETURNS TABLE (rank integer, image_id bigint, name text, label text, score double precision,
               used_method text, item_key text, metadata jsonb, suggested text, probability double precision)
LANGUAGE plpython3u AS $$
from image_similarity.contexts import plpython
return plpython.rank_candidates(plpy, query, query_name, top, method, model_version)
$$;

-- Every step after ingestion: featurize (committing each batch), split, train, evaluate.
CREATE OR REPLACE PROCEDURE image_similarity.initial_run_once(backbone text DEFAULT NULL,
                                                              test_fraction double precision DEFAULT 0.25,
                                                              seed integer DEFAULT 0,
                                                              INOUT model_version integer DEFAULT NULL,
                                                              INOUT test_accuracy double precision DEFAULT NULL,
                                                              INOUT best_method text DEFAULT NULL,
                                                              INOUT pid integer DEFAULT NULL)
LANGUAGE plpython3u AS $$
from image_similarity.contexts import plpython
return plpython.initial_run_once(plpy, backbone, test_fraction, seed)
$$;

-- issue 17: the top k most similar catalogue images of every catalogue image, stored in the neighbors table
-- (same methods and near-duplicate exclusion as rank_candidates), committing each block of rows: an interrupted
-- call resumes, a repeated call adds nothing. refresh: first remove this backbone's and method's rows.
-- CALL it outside an explicit transaction. Read one image's list with a single query, e.g.
-- SELECT n.rank, n.neighbor_id, i.name, n.score FROM neighbors n JOIN images i ON i.id = n.neighbor_id
-- WHERE n.image_id = 42 AND n.backbone = 'efficientnet_lite0' AND n.method = 'cosine' ORDER BY n.rank;
CREATE OR REPLACE PROCEDURE image_similarity.compute_neighbors(backbone text DEFAULT NULL,
                                                               method text DEFAULT NULL,
                                                               top integer DEFAULT 10,
                                                               model_version integer DEFAULT NULL,
                                                               refresh boolean DEFAULT false,
                                                               INOUT added integer DEFAULT NULL,
                                                               INOUT used_method text DEFAULT NULL,
                                                               INOUT pid integer DEFAULT NULL)
LANGUAGE plpython3u AS $$
from image_similarity.contexts import plpython
return plpython.compute_neighbors(plpy, backbone, method, top, model_version, refresh)
$$;

-- issue 14: fine-tune a pretrained backbone on the training split's labels (validation carved out of it; the
-- test split is never read); stored in networks/network_arrays as a new network, usable as a backbone by every
-- routine above. Commits after every epoch: an interrupted call resumes when called again with the same
-- arguments, and a finished one returns the stored network. CALL it outside an explicit transaction.
CREATE OR REPLACE PROCEDURE image_similarity.refine_model(backbone text DEFAULT NULL,
                                                          epochs integer DEFAULT NULL,
                                                          seed integer DEFAULT 0,
                                                          INOUT network text DEFAULT NULL,
                                                          INOUT best_epoch integer DEFAULT NULL,
                                                          INOUT val_accuracy double precision DEFAULT NULL,
                                                          INOUT device text DEFAULT NULL,
                                                          INOUT pid integer DEFAULT NULL)
LANGUAGE plpython3u AS $$
from image_similarity.contexts import plpython
return plpython.refine_model(plpy, backbone, epochs, seed)
$$;
