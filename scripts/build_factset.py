"""Build memit_lab's CounterFact-format fact set for the bundled model (``memit_lab/data/factset*.json``).

Everything comes from the entity tables below (public knowledge, written for memit_lab):
one line per object, ``object: subject; subject; ...``. Two relations are derived from
the others (the continent of a city from its country, the country of a landmark from its
city). For each relation the script knows its edit template, two paraphrase templates and
two generation prompts, chosen by measuring: the edit template is the candidate wording
the bundled model answers top-1 most often (the scores are in the data card).

A record is made for every subject whose true object has at least 6 subjects in its
relation, so it gets 5 neighbourhood prompts (other subjects, same relation, same true
object). Its counterfactual target is another object of the same relation, drawn with a
seeded generator; its attribute prompts are subjects whose true object is that target.
Each record is then scored by the bundled model (SmolLM2-135M-Instruct, float32, CPU):
``p_true`` = P(target_true | edit prompt) (the whole target, teacher-forced) and
``known`` = the target's first token is the model's top-1 next token. Reference texts for
RS (one per relation and object, in the reference's ``attribute_snippets`` format) are
the table's sentences about that object.

Deterministic: the same tables and seed give the same file (the scores to the float on the
same CPU and torch). About a minute on 2 cores.

Usage: .venv/bin/python scripts/build_factset.py [--out memit_lab/data] [--seed 0] [--no-score]
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# fmt: off
CITY_COUNTRY = """
France: Paris; Lyon; Marseille; Toulouse; Nice; Bordeaux; Lille; Strasbourg; Nantes; Montpellier; Rennes; Reims;
    Grenoble; Dijon; Avignon; Cannes
Germany: Berlin; Munich; Hamburg; Frankfurt; Cologne; Stuttgart; Dusseldorf; Dresden; Leipzig; Hanover; Nuremberg;
    Bremen; Bonn; Heidelberg; Dortmund; Essen
Italy: Rome; Milan; Naples; Turin; Florence; Venice; Bologna; Genoa; Palermo; Verona; Pisa; Bari; Catania; Trieste;
    Siena; Padua
Spain: Madrid; Barcelona; Seville; Bilbao; Malaga; Zaragoza; Granada; Alicante; Salamanca; Pamplona; San Sebastian;
    Murcia; Cadiz; Ibiza
Portugal: Lisbon; Porto; Coimbra; Braga; Faro; Aveiro; Funchal; Evora
the Netherlands: Amsterdam; Rotterdam; The Hague; Utrecht; Eindhoven; Groningen; Maastricht; Leiden; Haarlem
Belgium: Brussels; Antwerp; Ghent; Bruges; Liege; Leuven; Namur; Charleroi
Switzerland: Zurich; Geneva; Basel; Bern; Lausanne; Lucerne; Lugano; Zermatt
Austria: Vienna; Salzburg; Innsbruck; Graz; Linz; Klagenfurt
Poland: Warsaw; Krakow; Gdansk; Wroclaw; Poznan; Lodz; Lublin; Szczecin
the Czech Republic: Prague; Brno; Ostrava; Pilsen; Olomouc; Liberec
Greece: Athens; Thessaloniki; Patras; Heraklion; Larissa; Volos; Ioannina
Russia: Moscow; Saint Petersburg; Novosibirsk; Yekaterinburg; Kazan; Vladivostok; Sochi; Samara; Omsk; Volgograd
Sweden: Stockholm; Gothenburg; Malmo; Uppsala; Linkoping; Orebro
Norway: Oslo; Bergen; Trondheim; Stavanger; Tromso; Drammen
Denmark: Copenhagen; Aarhus; Odense; Aalborg; Esbjerg; Roskilde
Finland: Helsinki; Tampere; Turku; Oulu; Espoo; Vantaa
Ireland: Dublin; Cork; Galway; Limerick; Waterford; Kilkenny
England: London; Manchester; Liverpool; Leeds; Sheffield; Bristol; Oxford; Nottingham; Leicester; Southampton;
    Brighton; Coventry
Scotland: Edinburgh; Glasgow; Aberdeen; Dundee; Inverness; Stirling
Turkey: Istanbul; Ankara; Izmir; Antalya; Bursa; Konya; Adana; Trabzon
Egypt: Cairo; Alexandria; Luxor; Aswan; Giza; Port Said
Morocco: Casablanca; Marrakesh; Rabat; Fez; Tangier; Agadir
Nigeria: Lagos; Abuja; Kano; Ibadan; Port Harcourt; Benin City
Kenya: Nairobi; Mombasa; Kisumu; Nakuru; Eldoret; Malindi
South Africa: Johannesburg; Cape Town; Durban; Pretoria; Port Elizabeth; Bloemfontein
India: Mumbai; Delhi; Bangalore; Kolkata; Chennai; Ahmedabad; Pune; Jaipur; Lucknow; Kanpur; Agra; Varanasi
Pakistan: Karachi; Lahore; Islamabad; Rawalpindi; Faisalabad; Peshawar; Quetta; Multan
China: Beijing; Shanghai; Guangzhou; Shenzhen; Chengdu; Wuhan; Nanjing; Hangzhou; Tianjin; Chongqing; Harbin
Japan: Tokyo; Osaka; Kyoto; Yokohama; Nagoya; Sapporo; Kobe; Fukuoka; Hiroshima; Sendai; Nagasaki; Nara
South Korea: Seoul; Busan; Incheon; Daegu; Daejeon; Gwangju; Ulsan; Suwon
Vietnam: Hanoi; Ho Chi Minh City; Da Nang; Haiphong; Hue; Nha Trang
Thailand: Bangkok; Chiang Mai; Phuket; Pattaya; Ayutthaya; Hat Yai
Indonesia: Jakarta; Surabaya; Bandung; Medan; Semarang; Yogyakarta
the Philippines: Manila; Cebu; Davao; Quezon City; Makati; Baguio
Australia: Sydney; Melbourne; Brisbane; Adelaide; Canberra; Hobart; Darwin; Cairns
New Zealand: Auckland; Wellington; Christchurch; Dunedin; Queenstown; Rotorua; Tauranga
Canada: Toronto; Montreal; Vancouver; Calgary; Ottawa; Edmonton; Winnipeg; Quebec City; Halifax; Regina; Saskatoon
the United States: New York; Los Angeles; Chicago; Houston; Phoenix; Philadelphia; San Antonio; San Diego; Dallas;
    San Francisco; Seattle; Boston; Denver; Atlanta; Miami; Detroit; Las Vegas; New Orleans; Nashville
Mexico: Mexico City; Guadalajara; Monterrey; Puebla; Tijuana; Cancun; Acapulco; Oaxaca; Veracruz
Brazil: Sao Paulo; Rio de Janeiro; Brasilia; Fortaleza; Belo Horizonte; Manaus; Curitiba; Recife; Porto Alegre
Argentina: Buenos Aires; Rosario; Mendoza; La Plata; Mar del Plata; Salta; Ushuaia
Chile: Santiago; Valparaiso; Antofagasta; Vina del Mar; Punta Arenas; Iquique; La Serena
Colombia: Bogota; Medellin; Cali; Barranquilla; Bucaramanga; Santa Marta; Pereira
Peru: Lima; Cusco; Arequipa; Iquitos; Puno; Chiclayo; Piura
Israel: Tel Aviv; Haifa; Eilat; Beersheba; Netanya; Ashdod; Nazareth
Iran: Tehran; Isfahan; Shiraz; Tabriz; Mashhad; Qom
Saudi Arabia: Riyadh; Jeddah; Mecca; Medina; Dammam; Taif
Ukraine: Kyiv; Kharkiv; Odessa; Lviv; Dnipro; Zaporizhzhia
Hungary: Budapest; Debrecen; Szeged; Pecs; Gyor; Miskolc
Romania: Bucharest; Cluj-Napoca; Timisoara; Iasi; Constanta; Brasov
Croatia: Zagreb; Split; Dubrovnik; Rijeka; Zadar; Osijek
Bulgaria: Sofia; Plovdiv; Varna; Burgas; Ruse; Stara Zagora
Cuba: Havana; Santiago de Cuba; Camaguey; Holguin; Varadero; Cienfuegos
"""

CITY_STATE = """
Texas: Houston; Dallas; Austin; San Antonio; El Paso; Fort Worth; Corpus Christi; Lubbock; Laredo; Amarillo; Plano;
    Waco
California: Los Angeles; San Diego; San Jose; San Francisco; Fresno; Sacramento; Oakland; Long Beach; Bakersfield;
    Anaheim; Santa Barbara; Palo Alto
Florida: Miami; Orlando; Tampa; Jacksonville; Tallahassee; Fort Lauderdale; Gainesville; Sarasota; Key West;
    Pensacola
Ohio: Columbus; Cleveland; Cincinnati; Toledo; Akron; Dayton; Youngstown
New York: Buffalo; Rochester; Syracuse; Albany; Yonkers; Ithaca; Schenectady
Pennsylvania: Philadelphia; Pittsburgh; Allentown; Erie; Scranton; Harrisburg
Illinois: Chicago; Peoria; Rockford; Naperville; Joliet; Champaign; Evanston
Michigan: Detroit; Grand Rapids; Lansing; Ann Arbor; Flint; Kalamazoo; Dearborn
Arizona: Phoenix; Tucson; Mesa; Scottsdale; Tempe; Flagstaff; Chandler; Yuma
Washington: Seattle; Spokane; Tacoma; Olympia; Bellevue; Everett; Yakima
Colorado: Denver; Boulder; Colorado Springs; Fort Collins; Pueblo; Aspen; Greeley
Tennessee: Nashville; Memphis; Knoxville; Chattanooga; Clarksville; Murfreesboro
Massachusetts: Boston; Worcester; Lowell; New Bedford; Quincy; Framingham; Brockton
North Carolina: Charlotte; Raleigh; Greensboro; Winston-Salem; Asheville; Chapel Hill
Georgia: Atlanta; Savannah; Macon; Valdosta; Marietta; Alpharetta
Nevada: Las Vegas; Reno; Henderson; Carson City; Sparks; Elko
Louisiana: New Orleans; Baton Rouge; Shreveport; Lake Charles; Metairie; Houma
Missouri: St. Louis; Jefferson City; Branson; Independence; Joplin; St. Joseph
Minnesota: Minneapolis; Saint Paul; Duluth; St. Cloud; Mankato; Moorhead
Oregon: Portland; Eugene; Bend; Medford; Corvallis; Beaverton
Utah: Salt Lake City; Provo; Ogden; St. George; Logan; Orem
Virginia: Richmond; Norfolk; Virginia Beach; Charlottesville; Roanoke; Chesapeake
Wisconsin: Milwaukee; Madison; Green Bay; Kenosha; Racine; Oshkosh
"""

LANDMARK_CITY = """
Paris: The Eiffel Tower; The Louvre; Notre-Dame Cathedral; The Arc de Triomphe; The Champs-Elysees;
    The Sacre-Coeur Basilica; The Musee d'Orsay; The Palais Garnier; The Centre Pompidou; The Moulin Rouge
London: Big Ben; The Tower of London; Buckingham Palace; Westminster Abbey; Tower Bridge; The British Museum;
    Trafalgar Square; St Paul's Cathedral; Hyde Park; The London Eye; The Shard
Rome: The Colosseum; The Trevi Fountain; The Pantheon; The Roman Forum; The Spanish Steps; Castel Sant'Angelo;
    The Circus Maximus; The Baths of Caracalla; Piazza Navona
New York: The Statue of Liberty; The Empire State Building; Times Square; Central Park; The Brooklyn Bridge;
    The Metropolitan Museum of Art; Rockefeller Center; The Chrysler Building; Wall Street; One World Trade Center
Barcelona: The Sagrada Familia; Park Guell; Casa Batllo; Casa Mila; La Rambla; Camp Nou; The Gothic Quarter
Madrid: The Prado Museum; Retiro Park; Puerta del Sol; The Santiago Bernabeu Stadium; The Reina Sofia Museum;
    The Almudena Cathedral
Berlin: The Brandenburg Gate; The Reichstag; Checkpoint Charlie; Museum Island; Alexanderplatz; The Pergamon Museum;
    The Kaiser Wilhelm Memorial Church; Potsdamer Platz
Moscow: The Kremlin; Red Square; Saint Basil's Cathedral; The Bolshoi Theatre; Lenin's Mausoleum; Gorky Park;
    The Tretyakov Gallery
Athens: The Acropolis; The Parthenon; The Temple of Olympian Zeus; The Erechtheion; The Panathenaic Stadium;
    Syntagma Square; Mount Lycabettus
Venice: St. Mark's Basilica; The Rialto Bridge; The Doge's Palace; The Grand Canal; The Bridge of Sighs
Florence: The Uffizi Gallery; Ponte Vecchio; Palazzo Vecchio; The Pitti Palace; The Boboli Gardens;
    The Basilica of Santa Croce
Istanbul: The Hagia Sophia; The Blue Mosque; Topkapi Palace; The Grand Bazaar; The Galata Tower; The Basilica Cistern;
    Dolmabahce Palace
Beijing: The Forbidden City; Tiananmen Square; The Temple of Heaven; The Summer Palace; The Great Hall of the People;
    The Lama Temple
Tokyo: The Senso-ji Temple; The Meiji Shrine; Shibuya Crossing; Akihabara; Ginza; The Tsukiji Market
Cairo: The Egyptian Museum; Khan el-Khalili; The Citadel of Saladin; Al-Azhar Mosque; The Mosque of Muhammad Ali;
    Tahrir Square
San Francisco: The Golden Gate Bridge; Alcatraz Island; Fisherman's Wharf; Lombard Street; Coit Tower;
    The Transamerica Pyramid
Sydney: Bondi Beach; Darling Harbour; Taronga Zoo; Circular Quay; Manly Beach; The Queen Victoria Building
Washington: The White House; The Lincoln Memorial; The Capitol; The Smithsonian; The Jefferson Memorial;
    The National Mall; The Library of Congress
Los Angeles: The Hollywood Sign; The Getty Center; Griffith Observatory; The Hollywood Walk of Fame; Venice Beach;
    Dodger Stadium
Chicago: The Willis Tower; Millennium Park; Navy Pier; Wrigley Field; Cloud Gate; The Magnificent Mile; Soldier Field
Jerusalem: The Western Wall; The Dome of the Rock; The Church of the Holy Sepulchre; Al-Aqsa Mosque; Yad Vashem;
    The Mount of Olives
Amsterdam: The Rijksmuseum; The Anne Frank House; The Van Gogh Museum; Dam Square; Vondelpark;
    The Rembrandt House Museum
Prague: Charles Bridge; St. Vitus Cathedral; The Dancing House; Wenceslas Square; Petrin Tower; Vysehrad
Saint Petersburg: The Hermitage Museum; The Winter Palace; Peterhof Palace; The Church of the Savior on Spilled Blood;
    Nevsky Prospect; The Peter and Paul Fortress; Saint Isaac's Cathedral
Vienna: Schonbrunn Palace; St. Stephen's Cathedral; The Hofburg; The Belvedere; The Prater; The Spanish Riding School;
    The Albertina
Rio de Janeiro: Christ the Redeemer; Sugarloaf Mountain; Copacabana Beach; Ipanema Beach; The Maracana Stadium;
    The Selaron Steps
Kyoto: Kinkaku-ji; Fushimi Inari Shrine; Kiyomizu-dera; Ginkaku-ji; The Arashiyama Bamboo Grove; Nijo Castle
Edinburgh: Holyrood Palace; The Royal Mile; Arthur's Seat; Calton Hill; The Scott Monument; Greyfriars Kirkyard
Agra: The Taj Mahal
Dubai: The Burj Khalifa; The Burj Al Arab; The Palm Jumeirah
Pisa: The Leaning Tower of Pisa
"""

COUNTRY_LANGUAGE = """
Spanish: Spain; Mexico; Argentina; Colombia; Peru; Venezuela; Chile; Ecuador; Guatemala; Cuba; Bolivia; Honduras;
    Paraguay; Nicaragua; Costa Rica; Panama; Uruguay; El Salvador; the Dominican Republic; Equatorial Guinea
Portuguese: Portugal; Brazil; Angola; Mozambique; Cape Verde; Guinea-Bissau; Sao Tome and Principe
French: France; Senegal; Ivory Coast; Guinea; Benin; Togo; Gabon; Monaco; the Republic of the Congo
English: Jamaica; Nigeria; Ghana; Liberia; Sierra Leone; Zambia; Belize; Guyana; Barbados; Trinidad and Tobago;
    the Bahamas; Australia; the United Kingdom
Arabic: Egypt; Saudi Arabia; Syria; Jordan; Lebanon; Libya; Tunisia; Yemen; Oman; Kuwait; Qatar; Bahrain;
    the United Arab Emirates
German: Germany; Austria; Liechtenstein
Italian: Italy; San Marino
Russian: Russia
Dutch: the Netherlands; Suriname
Japanese: Japan
Polish: Poland
Turkish: Turkey
Greek: Greece
Swedish: Sweden
Hebrew: Israel
Korean: South Korea
Hungarian: Hungary
Finnish: Finland
"""

COUNTRY_CONTINENT = """
Africa: Nigeria; Kenya; Ghana; Ethiopia; Egypt; Morocco; Algeria; Tunisia; Libya; Sudan; South Africa; Senegal; Mali;
    Niger; Chad; Cameroon; Uganda; Tanzania; Rwanda; Burundi; Somalia; Zambia; Zimbabwe; Botswana; Namibia; Angola;
    Mozambique; Madagascar; Malawi; Liberia; Sierra Leone; Guinea; Benin; Togo; Gabon; Eritrea; Mauritania; Lesotho
Europe: France; Germany; Italy; Spain; Portugal; Belgium; Switzerland; Austria; Poland; Greece; Sweden; Norway;
    Denmark; Finland; Ireland; Hungary; Romania; Bulgaria; Croatia; Serbia; Slovakia; Slovenia; Estonia; Latvia;
    Lithuania; Ukraine; Belarus; Iceland; Luxembourg; Albania; Moldova; Montenegro
Asia: China; Japan; India; Pakistan; Bangladesh; Indonesia; Vietnam; Thailand; Malaysia; Singapore; Nepal; Mongolia;
    Cambodia; Laos; Myanmar; Sri Lanka; Afghanistan; Iran; Iraq; Saudi Arabia; Kazakhstan; Uzbekistan; South Korea;
    North Korea; Bhutan; Oman; Yemen; Jordan; Syria; Taiwan
South America: Argentina; Brazil; Chile; Peru; Colombia; Venezuela; Ecuador; Bolivia; Paraguay; Uruguay; Guyana;
    Suriname
North America: Canada; Mexico; Cuba; Guatemala; Honduras; Jamaica; Haiti; Panama; Costa Rica; Nicaragua; El Salvador;
    Belize
Oceania: Australia; New Zealand; Fiji; Papua New Guinea; Samoa; Tonga; Vanuatu
"""

COUNTRY_CURRENCY = """
euro: Germany; France; Italy; Spain; Portugal; the Netherlands; Belgium; Austria; Ireland; Finland; Greece; Slovakia;
    Slovenia; Estonia; Latvia; Lithuania; Luxembourg; Malta; Cyprus; Croatia
peso: Mexico; Argentina; Chile; Colombia; Cuba; the Philippines; Uruguay; the Dominican Republic
rupee: India; Pakistan; Sri Lanka; Nepal; Mauritius; the Seychelles
dinar: Algeria; Tunisia; Iraq; Jordan; Kuwait; Libya; Serbia; Bahrain
pound: the United Kingdom; Egypt; Lebanon; Syria; Sudan; South Sudan
dollar: the United States; Canada; Australia; New Zealand; Singapore; Jamaica; Fiji; the Bahamas; Barbados; Belize;
    Liberia; Namibia; Guyana; Taiwan; Trinidad and Tobago; Brunei
franc: Switzerland; Senegal; Mali; Niger; Cameroon; Chad; Gabon; Benin; Togo; Burkina Faso; Rwanda; Burundi; Guinea;
    Djibouti
shilling: Kenya; Uganda; Tanzania; Somalia
yen: Japan
yuan: China
won: South Korea; North Korea
real: Brazil
ruble: Russia; Belarus
lira: Turkey
rand: South Africa
naira: Nigeria
baht: Thailand
krona: Sweden; Iceland
"""

COMPANY_COUNTRY = """
the United States: Apple; Microsoft; Google; Amazon; IBM; Intel; Coca-Cola; McDonald's; Nike; Boeing; Walmart;
    General Motors; Disney; Netflix; Starbucks; PepsiCo; Tesla; Facebook; Oracle; Cisco; Hewlett-Packard; Dell;
    Nvidia; Harley-Davidson
Japan: Sony; Toyota; Honda; Nintendo; Panasonic; Canon; Nikon; Toshiba; Hitachi; Mitsubishi; Yamaha; Suzuki; Mazda;
    Subaru; Fujifilm; Nissan; Sega; Casio; Seiko; Bridgestone; Uniqlo
Germany: BMW; Siemens; Adidas; Puma; Bosch; SAP; Bayer; BASF; Lufthansa; Audi; Porsche; Volkswagen; Mercedes-Benz;
    Allianz; Aldi; Lidl; Miele; Haribo
France: Renault; Peugeot; Citroen; L'Oreal; Michelin; Danone; Chanel; Louis Vuitton; Carrefour; TotalEnergies; Hermes;
    Dior; Sanofi; AXA; Lacoste
Italy: Fiat; Ferrari; Lamborghini; Maserati; Alfa Romeo; Gucci; Prada; Armani; Benetton; Pirelli; Barilla; Ducati;
    Lavazza; Ferrero; Versace; Bulgari; Olivetti
South Korea: Samsung; Hyundai; Kia; LG; Daewoo; Posco
the United Kingdom: BP; Rolls-Royce; Jaguar; Land Rover; Aston Martin; HSBC; Barclays; Tesco; Burberry; Vodafone;
    Cadbury; Marks & Spencer; Bentley
Sweden: Volvo; IKEA; Ericsson; H&M; Saab; Spotify; Electrolux; Scania
Switzerland: Nestle; Rolex; Novartis; Roche; Swatch; Omega; UBS; Lindt; Logitech; TAG Heuer
Finland: Nokia; Rovio; Kone; Marimekko; Fiskars; Supercell; Fazer
the Netherlands: Philips; Heineken; ING; KLM; ASML; TomTom; Akzo Nobel
China: Huawei; Lenovo; Alibaba; Tencent; Xiaomi; Baidu; BYD; ZTE; Haier; Geely; DJI; Sinopec
Taiwan: Acer; Asus; HTC; TSMC; Foxconn
Canada: BlackBerry; Bombardier; Tim Hortons; Shopify; Lululemon; Cirque du Soleil
Denmark: Lego; Carlsberg; Maersk; Bang & Olufsen; Vestas; Novo Nordisk
"""

PERSON_OCCUPATION = """
physicist: Albert Einstein; Isaac Newton; Niels Bohr; Max Planck; Werner Heisenberg; Erwin Schrodinger;
    Richard Feynman; Enrico Fermi; Paul Dirac; James Clerk Maxwell; Ernest Rutherford; Stephen Hawking;
    Wolfgang Pauli; Max Born; Robert Oppenheimer
composer: Ludwig van Beethoven; Wolfgang Amadeus Mozart; Johann Sebastian Bach; Franz Schubert; Johannes Brahms;
    Richard Wagner; Giuseppe Verdi; Pyotr Ilyich Tchaikovsky; Antonio Vivaldi; George Frideric Handel; Joseph Haydn;
    Claude Debussy; Igor Stravinsky; Gustav Mahler; Felix Mendelssohn; Antonin Dvorak
painter: Pablo Picasso; Vincent van Gogh; Claude Monet; Rembrandt; Salvador Dali; Henri Matisse; Paul Cezanne;
    Edvard Munch; Gustav Klimt; Frida Kahlo; Johannes Vermeer; Paul Gauguin; Pierre-Auguste Renoir; Edgar Degas;
    Caravaggio; Titian; Jackson Pollock; Diego Velazquez; Francisco Goya; Raphael
poet: William Wordsworth; John Keats; Lord Byron; Percy Bysshe Shelley; Emily Dickinson; Walt Whitman; Robert Frost;
    T. S. Eliot; Sylvia Plath; Pablo Neruda; Dante Alighieri; Rumi; Samuel Taylor Coleridge; Alfred Tennyson;
    Langston Hughes; Rainer Maria Rilke
philosopher: Plato; Aristotle; Socrates; Immanuel Kant; Friedrich Nietzsche; Rene Descartes; David Hume; John Locke;
    Georg Wilhelm Friedrich Hegel; Baruch Spinoza; Thomas Hobbes; Soren Kierkegaard; Arthur Schopenhauer; Confucius;
    Ludwig Wittgenstein
mathematician: Carl Friedrich Gauss; Leonhard Euler; Pierre de Fermat; Bernhard Riemann; David Hilbert;
    Srinivasa Ramanujan; Euclid; Evariste Galois; Henri Poincare; Georg Cantor; Emmy Noether; Joseph-Louis Lagrange
chemist: Antoine Lavoisier; Dmitri Mendeleev; Robert Boyle; John Dalton; Linus Pauling; Humphry Davy; Fritz Haber;
    Dorothy Hodgkin
astronomer: Nicolaus Copernicus; Johannes Kepler; Tycho Brahe; Edwin Hubble; Carl Sagan; William Herschel;
    Edmond Halley
actor: Charlie Chaplin; Marlon Brando; Humphrey Bogart; James Dean; Cary Grant; John Wayne; Clark Gable; Paul Newman;
    Gregory Peck; Laurence Olivier; Jack Nicholson; Robert De Niro; Al Pacino; Tom Hanks; Denzel Washington
singer: Frank Sinatra; Elvis Presley; Whitney Houston; Aretha Franklin; Edith Piaf; Bing Crosby; Freddie Mercury;
    Ella Fitzgerald; Billie Holiday; Luciano Pavarotti
explorer: Christopher Columbus; Ferdinand Magellan; Marco Polo; Vasco da Gama; James Cook; Roald Amundsen;
    Ernest Shackleton; Amerigo Vespucci; Henry Hudson; Robert Falcon Scott; David Livingstone
architect: Frank Lloyd Wright; Le Corbusier; Antoni Gaudi; Ludwig Mies van der Rohe; Zaha Hadid; Frank Gehry;
    I. M. Pei; Christopher Wren; Andrea Palladio; Norman Foster; Walter Gropius; Oscar Niemeyer
sculptor: Auguste Rodin; Donatello; Gian Lorenzo Bernini; Constantin Brancusi; Alberto Giacometti; Henry Moore;
    Antonio Canova; Camille Claudel
director: Alfred Hitchcock; Steven Spielberg; Stanley Kubrick; Martin Scorsese; Akira Kurosawa; Federico Fellini;
    Ingmar Bergman; Quentin Tarantino; Francis Ford Coppola; Christopher Nolan
novelist: Charles Dickens; Jane Austen; Leo Tolstoy; Fyodor Dostoevsky; Mark Twain; Ernest Hemingway; Virginia Woolf;
    Franz Kafka; James Joyce; George Orwell; Gabriel Garcia Marquez; Victor Hugo; Herman Melville;
    F. Scott Fitzgerald
"""

ATHLETE_SPORT = """
soccer: Lionel Messi; Cristiano Ronaldo; Neymar; Kylian Mbappe; Zinedine Zidane; Pele; Diego Maradona; David Beckham;
    Ronaldinho; Wayne Rooney; Zlatan Ibrahimovic; Thierry Henry; Johan Cruyff; Franz Beckenbauer; Robert Lewandowski;
    Mohamed Salah; Luka Modric; Andres Iniesta
basketball: Michael Jordan; LeBron James; Kobe Bryant; Stephen Curry; Shaquille O'Neal; Magic Johnson; Larry Bird;
    Kevin Durant; Kareem Abdul-Jabbar; Tim Duncan; Dirk Nowitzki; Giannis Antetokounmpo; Wilt Chamberlain;
    Bill Russell; Dwyane Wade; Yao Ming
tennis: Roger Federer; Rafael Nadal; Novak Djokovic; Serena Williams; Venus Williams; Andre Agassi; Pete Sampras;
    Bjorn Borg; Steffi Graf; Martina Navratilova; Andy Murray; Maria Sharapova; John McEnroe; Boris Becker; Rod Laver;
    Carlos Alcaraz
golf: Tiger Woods; Jack Nicklaus; Arnold Palmer; Phil Mickelson; Rory McIlroy; Gary Player; Seve Ballesteros;
    Ernie Els; Annika Sorenstam; Jordan Spieth; Ben Hogan; Vijay Singh
baseball: Babe Ruth; Derek Jeter; Jackie Robinson; Hank Aaron; Mickey Mantle; Willie Mays; Lou Gehrig; Ichiro Suzuki;
    Shohei Ohtani; Barry Bonds; Ty Cobb; Joe DiMaggio; Roberto Clemente; Mike Trout
hockey: Wayne Gretzky; Sidney Crosby; Alexander Ovechkin; Mario Lemieux; Bobby Orr; Gordie Howe; Jaromir Jagr;
    Connor McDavid; Mark Messier; Maurice Richard
cricket: Sachin Tendulkar; Virat Kohli; Don Bradman; Brian Lara; Shane Warne; MS Dhoni; Ricky Ponting;
    Muttiah Muralitharan; Jacques Kallis; Kapil Dev; Viv Richards; Ben Stokes
"""

MUSICIAN_INSTRUMENT = """
piano: Frederic Chopin; Franz Liszt; Glenn Gould; Lang Lang; Vladimir Horowitz; Arthur Rubinstein; Martha Argerich;
    Alfred Brendel; Sviatoslav Richter; Thelonious Monk; Art Tatum; Bill Evans; Herbie Hancock; Sergei Rachmaninoff
guitar: Jimi Hendrix; Eric Clapton; Jimmy Page; Eddie Van Halen; B.B. King; Carlos Santana; Slash; Keith Richards;
    Django Reinhardt; Andres Segovia; Chet Atkins; Stevie Ray Vaughan; Brian May; David Gilmour; Jeff Beck
violin: Niccolo Paganini; Itzhak Perlman; Yehudi Menuhin; Jascha Heifetz; Joshua Bell; Anne-Sophie Mutter;
    Hilary Hahn; Fritz Kreisler; David Oistrakh; Isaac Stern
cello: Yo-Yo Ma; Pablo Casals; Jacqueline du Pre; Mstislav Rostropovich; Steven Isserlis; Mischa Maisky
saxophone: John Coltrane; Charlie Parker; Sonny Rollins; Stan Getz; Kenny G; Coleman Hawkins; Lester Young;
    Cannonball Adderley; Dexter Gordon; Wayne Shorter
trumpet: Louis Armstrong; Miles Davis; Dizzy Gillespie; Chet Baker; Wynton Marsalis; Clifford Brown; Freddie Hubbard;
    Roy Eldridge
drums: Ringo Starr; John Bonham; Keith Moon; Neil Peart; Buddy Rich; Gene Krupa; Travis Barker; Lars Ulrich;
    Charlie Watts; Max Roach; Art Blakey
"""

BOOK_AUTHOR = """
William Shakespeare: Hamlet; Macbeth; Othello; King Lear; Romeo and Juliet; The Tempest; Julius Caesar;
    A Midsummer Night's Dream; Twelfth Night; The Merchant of Venice; Much Ado About Nothing
Charles Dickens: Oliver Twist; Great Expectations; A Tale of Two Cities; David Copperfield; Bleak House;
    A Christmas Carol; Hard Times; Little Dorrit; The Pickwick Papers
Jane Austen: Pride and Prejudice; Emma; Sense and Sensibility; Persuasion; Mansfield Park; Northanger Abbey
J. R. R. Tolkien: The Hobbit; The Lord of the Rings; The Silmarillion; The Fellowship of the Ring; The Two Towers;
    The Return of the King
J. K. Rowling: Harry Potter and the Philosopher's Stone; Harry Potter and the Chamber of Secrets;
    Harry Potter and the Prisoner of Azkaban; Harry Potter and the Goblet of Fire;
    Harry Potter and the Order of the Phoenix; Harry Potter and the Half-Blood Prince;
    Harry Potter and the Deathly Hallows
Leo Tolstoy: War and Peace; Anna Karenina; The Death of Ivan Ilyich; Resurrection; The Kreutzer Sonata; Hadji Murat
Fyodor Dostoevsky: Crime and Punishment; The Brothers Karamazov; The Idiot; Demons; Notes from Underground;
    The Gambler
Mark Twain: Adventures of Huckleberry Finn; The Adventures of Tom Sawyer; A Connecticut Yankee in King Arthur's Court;
    The Prince and the Pauper; Life on the Mississippi; Pudd'nhead Wilson
George Orwell: Nineteen Eighty-Four; Animal Farm; Homage to Catalonia; Down and Out in Paris and London; Burmese Days;
    Coming Up for Air; The Road to Wigan Pier
Ernest Hemingway: The Old Man and the Sea; A Farewell to Arms; For Whom the Bell Tolls; The Sun Also Rises;
    A Moveable Feast; To Have and Have Not
Agatha Christie: Murder on the Orient Express; And Then There Were None; Death on the Nile;
    The Murder of Roger Ackroyd; The ABC Murders; Evil Under the Sun
Stephen King: The Shining; Carrie; Misery; The Stand; Pet Sematary; Salem's Lot; Cujo
Victor Hugo: Les Miserables; The Hunchback of Notre-Dame; Ninety-Three; The Toilers of the Sea; The Man Who Laughs
Jules Verne: Twenty Thousand Leagues Under the Seas; Around the World in Eighty Days;
    Journey to the Center of the Earth; From the Earth to the Moon; The Mysterious Island; Michael Strogoff
Homer: The Iliad; The Odyssey
"""

TEAM_SPORT = """
basketball: Los Angeles Lakers; Boston Celtics; Chicago Bulls; Golden State Warriors; Miami Heat; San Antonio Spurs;
    New York Knicks; Houston Rockets; Dallas Mavericks; Phoenix Suns; Milwaukee Bucks; Toronto Raptors;
    Denver Nuggets; Utah Jazz; Detroit Pistons; Philadelphia 76ers; Brooklyn Nets; Cleveland Cavaliers;
    Portland Trail Blazers; Atlanta Hawks; Orlando Magic; Indiana Pacers; Memphis Grizzlies; Sacramento Kings;
    Oklahoma City Thunder; Minnesota Timberwolves; Charlotte Hornets; New Orleans Pelicans; Washington Wizards;
    Los Angeles Clippers
football: New England Patriots; Dallas Cowboys; Green Bay Packers; Pittsburgh Steelers; San Francisco 49ers;
    Kansas City Chiefs; Chicago Bears; New York Giants; Denver Broncos; Seattle Seahawks; Miami Dolphins;
    Philadelphia Eagles; Baltimore Ravens; Buffalo Bills; Las Vegas Raiders; Minnesota Vikings; Cleveland Browns;
    Detroit Lions; Atlanta Falcons; New Orleans Saints; Tampa Bay Buccaneers; Indianapolis Colts; Los Angeles Rams;
    Cincinnati Bengals; Tennessee Titans; Jacksonville Jaguars; Houston Texans; Carolina Panthers; Arizona Cardinals;
    Los Angeles Chargers; New York Jets; Washington Commanders
baseball: New York Yankees; Boston Red Sox; Los Angeles Dodgers; Chicago Cubs; San Francisco Giants;
    St. Louis Cardinals; Atlanta Braves; Houston Astros; New York Mets; Philadelphia Phillies; Detroit Tigers;
    Oakland Athletics; Seattle Mariners; Toronto Blue Jays; Cleveland Guardians; Chicago White Sox; Baltimore Orioles;
    Minnesota Twins; Texas Rangers; Cincinnati Reds; Pittsburgh Pirates; Milwaukee Brewers; San Diego Padres;
    Colorado Rockies; Tampa Bay Rays; Kansas City Royals; Arizona Diamondbacks; Miami Marlins; Los Angeles Angels;
    Washington Nationals
hockey: Montreal Canadiens; Toronto Maple Leafs; Boston Bruins; Detroit Red Wings; Chicago Blackhawks;
    New York Rangers; Pittsburgh Penguins; Edmonton Oilers; Philadelphia Flyers; Vegas Golden Knights;
    Tampa Bay Lightning; Colorado Avalanche; Washington Capitals; Vancouver Canucks; Calgary Flames; St. Louis Blues;
    Dallas Stars; New York Islanders; Buffalo Sabres; Ottawa Senators; Minnesota Wild; Nashville Predators;
    Anaheim Ducks; San Jose Sharks; Los Angeles Kings; Florida Panthers; Carolina Hurricanes; New Jersey Devils;
    Winnipeg Jets; Columbus Blue Jackets; Seattle Kraken
"""
# fmt: on

# Countries of the city table that the continent table lacks; transcontinental ones are left out on purpose.
EXTRA_CONTINENTS = {
    "England": "Europe",
    "Scotland": "Europe",
    "the Netherlands": "Europe",
    "the Czech Republic": "Europe",
    "the Philippines": "Asia",
    "the United States": "North America",
    "Israel": "Asia",
}
TRANSCONTINENTAL = {"Russia", "Turkey"}
# Landmark cities that the city table lacks; Jerusalem's country is disputed and left out.
EXTRA_CITY_COUNTRIES = {"Washington": "the United States", "Dubai": "the United Arab Emirates"}


@dataclass(frozen=True)
class Relation:
    """A relation: its templates (``{}`` = subject) and its (subject, object) pairs."""

    name: str
    prompt: str
    paraphrases: tuple[str, str]
    generation: tuple[str, str]
    pairs: tuple[tuple[str, str], ...]


def parse(table: str) -> tuple[tuple[str, str], ...]:
    """``object: s1; s2`` lines (indented lines continue) -> (subject, object) pairs, in table order."""
    pairs = []
    # An indented line continues the line above it.
    for line in table.strip().replace(";\n    ", "; ").splitlines():
        obj, subjects = line.split(":", 1)
        pairs += [(s.strip(), obj.strip()) for s in subjects.split(";")]
    return tuple(pairs)


def derived_pairs() -> tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]]:
    """(city, continent) and (landmark, country) pairs, derived through the city -> country table."""
    continents = {country: cont for country, cont in parse(COUNTRY_CONTINENT)} | EXTRA_CONTINENTS
    city_country = dict(parse(CITY_COUNTRY)) | EXTRA_CITY_COUNTRIES
    city_continent = tuple(
        (city, continents[country])
        for city, country in parse(CITY_COUNTRY)
        if country in continents and country not in TRANSCONTINENTAL
    )
    landmark_country = tuple(
        (landmark, city_country[city]) for landmark, city in parse(LANDMARK_CITY) if city in city_country
    )
    return city_continent, landmark_country


def relations() -> list[Relation]:
    city_continent, landmark_country = derived_pairs()
    city_gen = ("{} is a city that", "People who visit {} usually")
    landmark_gen = ("{} is famous because", "{} was built")
    return [
        Relation(
            "city_country",
            "{} is a city in the country of",
            ("{} is located in the country of", "The city of {} is in the country of"),
            city_gen,
            parse(CITY_COUNTRY),
        ),
        Relation(
            "city_state",
            "{} is located in the US state of",
            ("{} is a city in the state of", "The city of {} is in the state of"),
            city_gen,
            parse(CITY_STATE),
        ),
        Relation(
            "city_continent",
            "{} is a city on the continent of",
            ("{} is located on the continent of", "The city of {} lies on the continent of"),
            city_gen,
            city_continent,
        ),
        Relation(
            "landmark_city",
            "{} is in the city of",
            ("{} is located in the city of", "{}, a famous landmark, is in the city of"),
            landmark_gen,
            parse(LANDMARK_CITY),
        ),
        Relation(
            "landmark_country",
            "{} is located in the country of",
            ("{} is in the country of", "{}, a famous landmark, is located in the country of"),
            landmark_gen,
            landmark_country,
        ),
        Relation(
            "country_language",
            "In {}, the official language is",
            ("The official language of {} is", "Most official documents in {} are written in"),
            ("The people of {} speak", "Growing up in {} means"),
            parse(COUNTRY_LANGUAGE),
        ),
        Relation(
            "country_continent",
            "{} is a country on the continent of",
            ("{} is located in the continent of", "The country of {} lies on the continent of"),
            ("{} is a country that", "The history of {} is"),
            parse(COUNTRY_CONTINENT),
        ),
        Relation(
            "country_currency",
            "The currency of {} is the",
            ("The official currency of {} is the", "In {}, prices are given in the"),
            ("In {}, shopping is", "The economy of {} is"),
            parse(COUNTRY_CURRENCY),
        ),
        Relation(
            "company_country",
            "{} is a multinational company from",
            ("{} is a company from", "The company {} is headquartered in"),
            ("{} is a company that", "The history of {} began"),
            parse(COMPANY_COUNTRY),
        ),
        Relation(
            "person_occupation",
            "{} is remembered as a great",
            ("{} was a world-famous", "{} worked as a"),
            ("{} is remembered for", "The life of {} was"),
            parse(PERSON_OCCUPATION),
        ),
        Relation(
            "athlete_sport",
            "{} plays professional",
            ("{} is a professional", "{} is famous for playing professional"),
            ("{} is famous for", "The career of {} began"),
            parse(ATHLETE_SPORT),
        ),
        Relation(
            "team_sport",
            "The {} play professional",
            ("The {} are a professional", "Fans of the {} love watching"),
            ("The {} are a team that", "The history of the {} began"),
            parse(TEAM_SPORT),
        ),
        Relation(
            "musician_instrument",
            "{} was a famous musician who played the",
            ("{} is famous for playing the", "{} played the"),
            ("{} is remembered for", "The music of {} is"),
            parse(MUSICIAN_INSTRUMENT),
        ),
        Relation(
            "book_author",
            "{} is a famous work by",
            ("{} was written by", "The famous work {} was written by"),
            ("{} tells the story of", "The main character of {} is"),
            parse(BOOK_AUTHOR),
        ),
    ]


MIN_NEIGHBOURS = 5
MAX_ATTRIBUTES = 5
SENTENCES_PER_SNIPPET = 24


def check_relation(rel: Relation) -> None:
    """One object per subject, and every template takes the subject once."""
    objects: dict[str, str] = {}
    for subject, obj in rel.pairs:
        if objects.setdefault(subject, obj) != obj:
            raise ValueError(f"{rel.name}: {subject!r} has two objects, {objects[subject]!r} and {obj!r}")
    for template in (rel.prompt, *rel.paraphrases, *rel.generation):
        if template.count("{}") != 1:
            raise ValueError(f"{rel.name}: template {template!r} must contain '{{}}' once")


def relation_records(rel: Relation, rng: random.Random) -> list[dict[str, Any]]:
    """CounterFact-format records (without scores) for the subjects that have enough neighbours."""
    check_relation(rel)
    by_object: dict[str, list[str]] = defaultdict(list)
    for subject, obj in rel.pairs:
        by_object[obj].append(subject)
    objects = sorted(by_object)
    records = []
    for subject, obj in rel.pairs:
        others = [s for s in by_object[obj] if s != subject]
        if len(others) < MIN_NEIGHBOURS:
            continue
        new = rng.choice([o for o in objects if o != obj])
        attributes = rng.sample(by_object[new], min(MAX_ATTRIBUTES, len(by_object[new])))
        records.append(
            {
                "requested_rewrite": {
                    "prompt": rel.prompt,
                    "subject": subject,
                    "relation_id": rel.name,
                    "target_new": {"str": new, "id": new},
                    "target_true": {"str": obj, "id": obj},
                },
                "paraphrase_prompts": [t.format(subject) for t in rel.paraphrases],
                "neighborhood_prompts": [rel.prompt.format(s) for s in rng.sample(others, MIN_NEIGHBOURS)],
                "attribute_prompts": [rel.prompt.format(s) for s in attributes],
                "generation_prompts": [t.format(subject) for t in rel.generation],
            }
        )
    return records


def snippets(rels: list[Relation], rng: random.Random) -> list[dict[str, Any]]:
    """Per relation and object: one reference text of table sentences that mention the object."""
    sentences: dict[str, list[str]] = defaultdict(list)
    for rel in rels:
        for subject, obj in rel.pairs:
            sentence = f"{rel.prompt.format(subject)} {obj}."
            sentences[obj].append(sentence)
            sentences[subject].append(sentence)
    out = []
    for rel in rels:
        for obj in sorted({o for _, o in rel.pairs}):
            pool = sentences[obj]
            chosen = rng.sample(pool, min(SENTENCES_PER_SNIPPET, len(pool)))
            out.append({"relation_id": rel.name, "target_id": obj, "samples": [{"text": " ".join(chosen)}]})
    return out


def score(records: list[dict[str, Any]]) -> None:
    """Add the bundled model's ``p_true`` and ``known`` to each record, in place."""
    from memit_lab import load_model
    from memit_lab.evaluate import token_hits
    from memit_lab.prompts import target_scores

    torch.set_num_threads(2)
    lm = load_model("smollm2-135m")
    prompts = [r["requested_rewrite"]["prompt"].format(r["requested_rewrite"]["subject"]) for r in records]
    targets = [r["requested_rewrite"]["target_true"]["str"] for r in records]
    hits = token_hits(lm, prompts, targets, progress=True)
    probs = [
        float(p)
        for lo in range(0, len(prompts), 256)
        for p in target_scores(lm, prompts[lo : lo + 256], targets[lo : lo + 256]).prob
    ]
    for record, hit, p in zip(records, hits, probs, strict=True):
        record["p_true"] = float(f"{p:.4g}")  # 4 significant digits: rare facts are tiny
        record["known"] = bool(hit[0])


def write_json_lines(path: Path, items: list[dict[str, Any]]) -> None:
    """A JSON list with one item per line: small, and diffs stay readable."""
    lines = ",\n".join(json.dumps(item, ensure_ascii=False) for item in items)
    path.write_text("[\n" + lines + "\n]\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "memit_lab" / "data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-score", action="store_true", help="skip the bundled model's p_true / known")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    rels = relations()
    records = [r for rel in rels for r in relation_records(rel, rng)]
    rng.shuffle(records)
    # case_id first, as in CounterFact; the seeded order makes every prefix mix relations.
    records = [{"case_id": i, **r} for i, r in enumerate(records)]
    if not args.no_score:
        score(records)
    write_json_lines(args.out / "factset.json", records)
    write_json_lines(args.out / "factset_snippets.json", snippets(rels, rng))
    counts = Counter(r["requested_rewrite"]["relation_id"] for r in records)
    known = Counter(r["requested_rewrite"]["relation_id"] for r in records if r.get("known"))
    for name in counts:
        print(f"{name:22s} {counts[name]:5d} records, {known[name] / counts[name]:.2f} known")
    print(f"{'total':22s} {len(records):5d} records, {sum(known.values()) / len(records):.2f} known")


if __name__ == "__main__":
    main()
