// node-postgres queries printed as JSON; run directly and through the agent, then compared.
'use strict';
const { Client } = require('pg');

async function main(host, app) {
  const client = new Client({ host, port: 5432, user: 'postgres', database: 'postgres',
                              application_name: app });
  await client.connect();
  const out = {};
  try {
    out.simple = (await client.query("select 1 as one, 'two' as two, now() is not null as ok")).rows;
    out.params = (await client.query('select $1::int * 2 as doubled, upper($2) as name, $3::jsonb as doc',
                                     [21, 'ringfence', { a: [1, 2] }])).rows;
    out.rows = (await client.query(
      'select g as id, md5(g::text) as hash, g % 3 = 0 as fizz from generate_series(1, $1::int) g', [50])).rows;
    const named = { name: 'by-id', text: 'select $1::text || $2::text as joined', values: ['a', 'b'] };
    out.named = [];
    for (const v of [['a', 'b'], ['c', 'd'], ['e', 'f']]) {
      out.named.push((await client.query({ ...named, values: v })).rows[0]);
    }
    await client.query('begin');
    await client.query('create temp table notes (id serial, body text)');
    const inserted = await client.query(
      "insert into notes (body) select 'note ' || g from generate_series(1, 25) g returning id");
    out.inserted = [inserted.command, inserted.rowCount];
    await client.query('commit');
    try {
      await client.query('select 1/0');
    } catch (e) {
      out.error = [e.code, e.message];
    }
    out.after = (await client.query('select count(*)::int as n from notes')).rows;
  } finally {
    await client.end();
  }
  return out;
}

main(process.argv[2], process.argv[3]).then(
  (out) => { process.stdout.write(JSON.stringify(out) + '\n'); },
  (err) => { console.error(err); process.exit(1); },
);
