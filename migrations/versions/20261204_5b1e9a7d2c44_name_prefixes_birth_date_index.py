"""name prefixes per search parameter, index on birth dates

Revision ID: 5b1e9a7d2c44
Revises: 5d1e7a3b9c20
Create Date: 2026-12-04 18:40:00.000000

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa

# revision identifiers, used by Alembic.
revision: str = '5b1e9a7d2c44'
down_revision: Union[str, Sequence[str], None] = '5d1e7a3b9c20'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

# patient.index.PREFIX_CHARS and NAME_SEARCH_PARTS when this was written.
PREFIX_CHARS = 5


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table('patient_name_prefixes',
    sa.Column('parameter', sa.String(length=8), nullable=False),
    sa.Column('prefix', sa.Text(collation='C'), nullable=False),
    sa.Column('patient_id', sa.UUID(), nullable=False),
    sa.ForeignKeyConstraint(['patient_id'], ['patients.id'], ),
    sa.PrimaryKeyConstraint('parameter', 'prefix', 'patient_id')
    )
    op.create_index('ix_patient_name_prefixes_patient_id', 'patient_name_prefixes', ['patient_id'], unique=False)
    op.create_index('ix_patients_birth_date', 'patients', ['birth_date_start', 'birth_date_end'], unique=False)
    # The prefixes of the tokens already stored, as patient.index derives
    # them: every part answers "name", family and given parts their own.
    op.execute(
        f"""
        INSERT INTO patient_name_prefixes (parameter, prefix, patient_id)
        SELECT DISTINCT s.parameter, left(t.token, n), t.patient_id
        FROM patient_name_tokens t
        CROSS JOIN generate_series(1, {PREFIX_CHARS}) AS n
        CROSS JOIN LATERAL (
            VALUES ('name'),
                   (CASE WHEN t.part IN ('family', 'given') THEN t.part END)
        ) AS s(parameter)
        WHERE n <= char_length(t.token) AND s.parameter IS NOT NULL
        """
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_index('ix_patients_birth_date', table_name='patients')
    op.drop_index('ix_patient_name_prefixes_patient_id', table_name='patient_name_prefixes')
    op.drop_table('patient_name_prefixes')
