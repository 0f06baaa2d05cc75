"""Make a table match a declared schema: select, order and cast columns, or say which one is wrong."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from schemas.errors import SchemaError


def conform(
    data: pa.Table | pa.RecordBatch,
    schema: pa.Schema,
    *,
    where: str = "table",
    keep_extra: bool = False,
    fill_missing_nullable: bool = True,
) -> pa.Table:
    """Return ``data`` with exactly ``schema``'s columns (plus extras when ``keep_extra``), cast to its types.

    A missing non-nullable column is a :class:`SchemaError` naming the column and ``where``; a missing
    nullable column is filled with nulls, so that optional columns may be left out of input files.
    """
    table = pa.Table.from_batches([data]) if isinstance(data, pa.RecordBatch) else data
    columns, fields = [], []
    for field in schema:
        if field.name not in table.column_names:
            if field.nullable and fill_missing_nullable:
                columns.append(pa.nulls(table.num_rows, field.type))
                fields.append(field)
                continue
            raise SchemaError(f"{where}: required column '{field.name}' is missing")
        col = table.column(field.name)
        if not col.type.equals(field.type):
            try:
                col = pc.cast(col, field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise SchemaError(
                    f"{where}: column '{field.name}' has type {col.type}, cannot cast to {field.type}: {e}"
                ) from e
        if not field.nullable and col.null_count:
            raise SchemaError(f"{where}: column '{field.name}' has {col.null_count} nulls but is required")
        columns.append(col)
        fields.append(field)
    if keep_extra:
        for name in table.column_names:
            if name not in schema.names:
                columns.append(table.column(name))
                fields.append(table.schema.field(name))
    return pa.Table.from_arrays(columns, schema=pa.schema(fields, metadata=schema.metadata))


def required_names(schema: pa.Schema) -> list[str]:
    """Names of the non-nullable columns of ``schema``."""
    return [f.name for f in schema if not f.nullable]
