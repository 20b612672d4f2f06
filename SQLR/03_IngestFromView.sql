-- IngestFromView (issue 29): ingest every row of the view dbo.image_source (item_key, label, data[, metadata])
-- that the database's owner created over their own table, as `image-similarity ingest --from-view` does from a
-- client. The view's name and columns are fixed (no SQL text or name from a caller is ever run): whether the view
-- has the optional metadata column (JSON text of an object: the item's attributes) is read from the catalogue
-- (COL_LENGTH), and the row is read by one of two constant statements through sp_executesql, since a statement
-- naming a column the view lacks would not compile. That dynamic read runs with the caller's permissions (SELECT
-- on the view: 13_Permissions.sql grants SELECT on the dbo schema to image_similarity_user). Rows are read one
-- at a time in key order (rows without a key are not read) and each goes through dbo.AddImage (the same checks
-- and its own transaction) under the name image_source/<key>; a row AddImage refuses (no bytes, not an image,
-- metadata that is not a JSON object) is recorded in rejected_files with the reason and the next row goes on. Safe to re-run: a key stored with the
-- same bytes adds nothing, with other bytes its row is replaced. Returns one row: rows, added, already_stored,
-- rejected. Conventions: see SQLR/04_FeaturizeImages.sql.
CREATE OR ALTER PROCEDURE dbo.IngestFromView
AS
BEGIN
    SET NOCOUNT ON;
    SET XACT_ABORT ON;
    IF OBJECT_ID(N'dbo.image_source') IS NULL
        THROW 50061, N'IngestFromView: no view dbo.image_source (item_key, label, data); create it first.', 1;
    DECLARE @key nvarchar(400) = N'', @next nvarchar(400), @label nvarchar(200), @data varbinary(max),
            @metadata nvarchar(max), @name nvarchar(400), @image_id int, @reason nvarchar(4000), @rows int = 0,
            @rejected int = 0, @last_id int = COALESCE((SELECT MAX(id) FROM dbo.images), 0),
            @read nvarchar(max) = CASE WHEN COL_LENGTH(N'dbo.image_source', N'metadata') IS NULL
                THEN N'SELECT TOP (1) @next = item_key, @label = label, @data = data, @metadata = NULL
                      FROM dbo.image_source WHERE item_key > @key ORDER BY item_key;'
                ELSE N'SELECT TOP (1) @next = item_key, @label = label, @data = data, @metadata = metadata
                      FROM dbo.image_source WHERE item_key > @key ORDER BY item_key;' END;
    WHILE 1 = 1
    BEGIN
        SET @next = NULL;
        EXEC sp_executesql @read, N'@key nvarchar(400), @next nvarchar(400) OUTPUT, @label nvarchar(200) OUTPUT,
            @data varbinary(max) OUTPUT, @metadata nvarchar(max) OUTPUT', @key = @key, @next = @next OUTPUT,
            @label = @label OUTPUT, @data = @data OUTPUT, @metadata = @metadata OUTPUT;
        IF @next IS NULL
            BREAK;
        SET @key = @next;
        SET @rows = @rows + 1;
        SET @name = CONCAT(N'image_source/', @key);
        SET @image_id = NULL;
        SET @reason = NULL;
        BEGIN TRY
            EXEC dbo.AddImage @name = @name, @label = @label, @data = @data, @item_key = @key,
                              @metadata = @metadata, @image_id = @image_id OUTPUT;
        END TRY
        BEGIN CATCH
            IF XACT_STATE() <> 0
                ROLLBACK TRANSACTION;
            SET @reason = ERROR_MESSAGE();
        END CATCH;
        IF @reason IS NOT NULL  -- AddImage refused the row before storing anything: record it as it records a bad file
        BEGIN
            UPDATE dbo.rejected_files SET seen_at = SYSUTCDATETIME()
            WHERE name = @name AND stage = N'ingest' AND reason = @reason;
            INSERT INTO dbo.rejected_files (name, label, stage, reason)
            SELECT @name, COALESCE(@label, N''), N'ingest', @reason
            WHERE NOT EXISTS (SELECT 1 FROM dbo.rejected_files AS r
                              WHERE r.name = @name AND r.stage = N'ingest' AND r.reason = @reason);
        END;
        IF @image_id IS NULL
            SET @rejected = @rejected + 1;
    END;
    DECLARE @added int = (SELECT COUNT(*) FROM dbo.images WHERE id > @last_id);
    SELECT @rows AS [rows], @added AS added, @rows - @added - @rejected AS already_stored, @rejected AS rejected;
END;
GO
